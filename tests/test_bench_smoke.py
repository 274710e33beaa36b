"""The benchmark command keeps working: a 2-second smoke run. No timing is asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


def _installed(tool: str) -> bool:
    """On PATH, or in an sbin directory (Debian puts nginx in /usr/sbin)."""
    return shutil.which(tool) is not None or any(
        os.access(Path(d) / tool, os.X_OK) for d in ("/usr/sbin", "/usr/local/sbin")
    )


def test_quick_benchmark_writes_a_report_with_verified_totals(
    tmp_path: Path, pg_admin_url: str
) -> None:
    """bench/run.py --quick loads every target, checks the database totals and writes a report,
    with the workers and paced-load sections."""
    missing = [tool for tool in ("wrk", "nginx") if not _installed(tool)]
    if missing:
        skip_or_fail(
            f"benchmark tools missing: {', '.join(missing)}; "
            "install with: apt-get install -y wrk nginx-light"
        )

    command = [sys.executable, "bench/run.py", "--quick", "--duration", "2"]
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
    assert "**Totals verified: yes**" in text, text
    assert "incrementer-wal" in text, text
    assert "incrementer-wal-auth" in text, text  # auth on is measured too
    assert "Auth on vs off" in text, text
    assert "Workers: `--workers 2` beside one process" in text, text
    assert "Latency at a paced load" in text, text
    assert reports[0].with_suffix(".png").is_file()


def test_wrk_gets_the_api_key_only_for_the_auth_variant() -> None:
    """The Lua script sends `Authorization: Bearer` only when given a key as its fifth argument;
    a paced run takes the paced script and its rate as the sixth."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import load
        from targets import INCREMENTER_AUTH, INCREMENTER_MODES, command_for
    finally:
        sys.path.remove(str(ROOT / "bench"))

    plain = load.command("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4)
    keyed = load.command("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4, "ik_x.y")
    paced = load.command("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4, "", 5000.4)
    assert plain[-4:] == ["10keys", "p-", "42", str(load.BATCH_SIZE)]
    assert keyed[-5:] == ["10keys", "p-", "42", str(load.BATCH_SIZE), "ik_x.y"]
    assert paced[-6:] == ["10keys", "p-", "42", str(load.BATCH_SIZE), "", "5000"]
    assert paced[paced.index("-s") + 1].endswith("paced.lua")
    assert plain[plain.index("-s") + 1].endswith("increments.lua")
    wal = next(t for t in INCREMENTER_MODES if t.durability == "wal")
    argv, _ = command_for(INCREMENTER_AUTH, Path("/nonexistent"), "postgresql://x/y")
    assert argv[argv.index("--auth") + 1] == "required"
    assert argv[argv.index("--durability") + 1] == wal.durability
    assert "--auth" not in command_for(wal, Path("/nonexistent"), "postgresql://x/y")[0]
