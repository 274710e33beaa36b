"""The benchmark command keeps working: a 2-second smoke run. No timing is asserted."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("INCREMENTER_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI") == "true"


def _installed(tool: str) -> bool:
    return shutil.which(tool) is not None or any(
        os.access(Path(d) / tool, os.X_OK) for d in ("/usr/sbin", "/usr/local/sbin")
    )


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


async def _postgres_reachable() -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    await conn.close()


def test_quick_benchmark_writes_a_report_with_verified_totals(tmp_path: Path) -> None:
    """bench/run.py --quick loads every target, checks the database totals and writes a report."""
    missing = [tool for tool in ("wrk", "nginx") if not _installed(tool)]
    if missing:
        _skip_or_fail(
            f"benchmark tools missing: {', '.join(missing)}; "
            "install with: apt-get install -y wrk nginx-light"
        )
    try:
        asyncio.run(_postgres_reachable())
    except (OSError, TimeoutError) as exc:
        _skip_or_fail(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}")

    command = [sys.executable, "bench/run.py", "--quick", "--duration", "2"]
    done = subprocess.run(
        [*command, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "BENCH_PG_ADMIN_URL": PG_ADMIN_URL},
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
    assert "incrementer-wal-auth" in text, text  # issue 5: auth on, measured too
    assert "Auth on vs off" in text, text
    assert reports[0].with_suffix(".png").is_file()


def test_wrk_gets_the_api_key_only_for_the_auth_variant() -> None:
    """The Lua script sends `Authorization: Bearer` only when given a key as its fifth argument."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import load
        from targets import INCREMENTER_AUTH, INCREMENTER_MODES, command_for
    finally:
        sys.path.remove(str(ROOT / "bench"))

    plain = load.command("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4)
    keyed = load.command("http://127.0.0.1:1", "10keys", "p-", 42, 1, 4, "ik_x.y")
    assert plain[-4:] == ["10keys", "p-", "42", str(load.BATCH_SIZE)]
    assert keyed[-5:] == ["10keys", "p-", "42", str(load.BATCH_SIZE), "ik_x.y"]
    wal = next(t for t in INCREMENTER_MODES if t.durability == "wal")
    argv, _ = command_for(INCREMENTER_AUTH, Path("/nonexistent"), "postgresql://x/y")
    assert argv[argv.index("--auth") + 1] == "required"
    assert argv[argv.index("--durability") + 1] == wal.durability
    assert "--auth" not in command_for(wal, Path("/nonexistent"), "postgresql://x/y")[0]
