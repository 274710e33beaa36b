"""The benchmark's own dependencies, checked before anything imports them: without the `bench`
extra, bench/run.py says what to install in one line instead of an ImportError's traceback."""

from __future__ import annotations

import importlib.util
import sys

NEEDED = ("rich", "matplotlib")

missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(
        f"bench/run.py needs {' and '.join(missing)}: install the bench extra, "
        "`.venv/bin/pip install '.[bench]'` (in a checkout: `-e '.[test,bench]'`)"
    )
