"""The benchmark's own dependencies, checked before anything imports them: without the `bench`
extra, `python -m bench.run` says what to install in one line instead of an ImportError's
traceback. Import this module before rich or matplotlib."""

from __future__ import annotations

import importlib.util
import sys

NEEDED = ("rich", "matplotlib")

missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(
        f"python -m bench.run needs {' and '.join(missing)}: install the bench extra, "
        "`.venv/bin/pip install '.[bench]'` (in a checkout: `-e '.[test,bench]'`)"
    )
