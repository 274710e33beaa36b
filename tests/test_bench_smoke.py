"""The benchmark commands keep working: a 2-second run of `python -m bench.run`, the hot path's
quickest mode, and the pieces the harness reads the service by. No timing is asserted."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import skip_or_fail

import bench
from bench.harness import load, metrics
from bench.harness.targets import INCREMENTER_AUTH, INCREMENTER_WAL, LEAN, command_for
from bench.report.tables import COLUMNS
from incrementer.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def _installed(tool: str) -> bool:
    """On PATH, or in an sbin directory (Debian puts nginx in /usr/sbin)."""
    return shutil.which(tool) is not None or any(
        os.access(Path(d) / tool, os.X_OK) for d in ("/usr/sbin", "/usr/local/sbin")
    )


def _row(text: str, scenario: str, target: str) -> list[str]:
    """The cells of one row of the report's results table."""
    prefix = f"| {scenario} | {target} |"
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_quick_benchmark_writes_a_report_with_verified_totals(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """python -m bench.run --quick loads every target, checks the database totals, reads the
    service's /metrics and writes a report, with the workers and paced-load sections."""
    missing = [tool for tool in ("wrk", "nginx") if not _installed(tool)]
    if missing:
        skip_or_fail(
            f"benchmark tools missing: {', '.join(missing)}; "
            "install with: apt-get install -y wrk nginx-light"
        )

    command = [sys.executable, "-m", "bench.run", "--quick", "--duration", "2"]
    done = subprocess.run(
        [*command, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "BENCH_PG_ADMIN_URL": pg_admin_url},
        capture_output=True,
        text=True,
        timeout=240,
    )

    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1, output
    text = reports[0].read_text()
    assert "-m bench.run --quick --duration 2" in text, text  # the command, as typed
    assert "**Totals verified: yes**" in text, text
    assert "incrementer-wal" in text, text
    assert "incrementer-wal-auth" in text, text  # auth on is measured too
    assert "Auth on vs off" in text, text
    assert "Workers: `--workers 2` beside one process" in text, text
    assert "Latency at a paced load" in text, text
    # Every run drained to exactly what /metrics said was accepted (a note says otherwise), and
    # the lag histogram was read: the harness understood the service's /metrics.
    assert "## Notes" not in text, text
    row = _row(text, "10keys", "incrementer-wal")
    assert row[COLUMNS.index("lag p99")] != "-", text
    assert row[COLUMNS.index("totals verified")] == "yes", text
    assert reports[0].with_suffix(".png").is_file()


@pytest.mark.parametrize(
    "options",
    [[], ["--lean"], ["--auth"], ["--batch", "5", "--idempotent"]],
    ids=["service", "lean", "auth", "idempotent-batches"],
)
def test_hotpath_measures_the_request_path(options: list[str]) -> None:
    """python -m bench.hotpath drives the real Service (or the lean floor) through its
    connections in its quickest mode and reports a CPU cost per request or increment."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--requests", "2000", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    unit = "increment" if "--batch" in options else "request"
    assert f"µs CPU per {unit}" in done.stdout, done.stdout


def test_every_bench_module_imports() -> None:
    """Each script and module of bench/ imports as part of the package: a module moved or
    renamed in src/ shows here, not at the next benchmark run."""
    names = [m.name for m in pkgutil.walk_packages(bench.__path__, "bench.")]
    assert "bench.run" in names and "bench.servers.lean" in names
    for name in names:
        importlib.import_module(name)


def test_metrics_are_read_from_the_services_own_exposition() -> None:
    """The harness reads the counters, gauges and histogram buckets it uses from what the
    service renders on /metrics (through prometheus-client's parser)."""
    service = Metrics()
    service.accepted_requests = 40
    service.accepted_batch_increments = 2
    service.gauge(metrics.OLDEST_PENDING, "Age of the oldest pending increment.", lambda: 0.5)
    for lag in (0.02, 0.02, 0.3):
        service.lag_seconds.observe(lag)
    before = metrics.Samples()

    samples = metrics.parse(service.render().decode())

    assert samples.value("incrementer_accepted_increments_total") == 42
    assert samples.value(metrics.OLDEST_PENDING) == 0.5
    assert metrics.delta(before, samples, metrics.LAG + "_count") == 3
    lag = metrics.histogram_delta(before, samples, metrics.LAG)
    assert lag[-1] == (float("inf"), 3)
    quantile = metrics.quantile(lag, 0.5)
    assert quantile is not None and 0.01 < quantile <= 0.025
    assert samples.value("no_such_metric_total") == 0 and samples.get("no_such") is None


def test_wrk_gets_the_api_key_only_for_the_auth_variant() -> None:
    """The Lua script sends `Authorization: Bearer` only when given a key as its fifth argument;
    a paced run takes the paced script and its rate as the sixth."""
    plain = load.Load("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4).argv()
    keyed = load.Load("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4, "ik_x.y").argv()
    paced = load.Load("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4, "", 5000.4).argv()
    assert plain[-4:] == ["10keys", "p-", "42", str(load.BATCH_SIZE)]
    assert keyed[-5:] == ["10keys", "p-", "42", str(load.BATCH_SIZE), "ik_x.y"]
    assert paced[-6:] == ["10keys", "p-", "42", str(load.BATCH_SIZE), "", "5000"]
    assert paced[paced.index("-s") + 1].endswith("paced.lua")
    assert plain[plain.index("-s") + 1].endswith("increments.lua")
    argv = command_for(INCREMENTER_AUTH, Path("/nonexistent"), "postgresql://x/y").argv
    assert argv[argv.index("--auth") + 1] == "required"
    assert argv[argv.index("--durability") + 1] == INCREMENTER_WAL.durability
    assert (
        "--auth" not in command_for(INCREMENTER_WAL, Path("/nonexistent"), "postgresql://x/y").argv
    )


def test_comparison_servers_start_as_modules_from_the_repository_root() -> None:
    """python-lean runs as `python -m bench.servers.lean` in the directory that holds bench/."""
    launch = command_for(LEAN, Path("/nonexistent"), "")
    assert launch.argv[1:3] == ["-m", "bench.servers.lean"]
    assert (launch.cwd / "bench" / "__init__.py").is_file()
