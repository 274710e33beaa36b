"""Where the benchmark reads and writes, from the repository root."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"  # reports, kept in git and quoted by docs/performance.md
WORK = BENCH / ".work"  # server logs and data dirs of runs, ignored by git
WRK_SCRIPTS = BENCH / "wrk"
