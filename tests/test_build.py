"""The build under test: the mypyc-compiled hot path by default, plain Python as the fallback."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import httpx
import pytest
from support import skip_or_fail, spawned

import incrementer
from incrementer import build

SOURCE = Path(incrementer.__file__).parent


def installed_extensions() -> dict[str, Path]:
    """Module name -> the extension file that setup.py's mypyc build put beside its source, in
    the package as installed (the source tree for an editable install, site-packages
    otherwise). Empty when the install skipped the compiler."""
    found = {}
    for path in SOURCE.rglob("*"):
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            continue
        source = path.with_name(path.name.removesuffix(suffix) + ".py")
        if source.exists():
            parts = source.relative_to(SOURCE.parent).with_suffix("").parts
            found[".".join(parts)] = path
    return found


def test_tests_run_against_the_compiled_hot_path() -> None:
    """Every extension module the install built is the module the tests import, so what
    `pip install .` ships is what they exercise; an install without them fails under CI=true."""
    built = installed_extensions()
    if not built:
        skip_or_fail(f"no compiled extension modules beside the sources in {SOURCE}")
    assert build.compiled()
    imported = {name: Path(importlib.import_module(name).__file__ or "") for name in built}
    assert imported == built


def test_a_source_edited_after_the_build_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled module whose source is newer than it is reported stale; one built after its
    source is not."""
    built = tmp_path / "hot.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "hot.py"
    source.write_text("")
    built.write_bytes(b"")
    module = types.ModuleType("incrementer._hot")
    module.__file__ = str(built)
    monkeypatch.setitem(sys.modules, "incrementer._hot", module)
    os.utime(source, (1_000, 1_000))
    assert "incrementer._hot" not in build.stale_extensions()
    os.utime(source, (2_000_000_000, 2_000_000_000))
    assert "incrementer._hot" in build.stale_extensions()


def test_an_extension_whose_source_moved_is_reported() -> None:
    """A compiled module left behind when its source moved (a rebuild does not delete it) is
    reported, by the name an import would still find it under."""
    orphan = SOURCE / "api" / f"moved_away{EXTENSION_SUFFIXES[0]}"
    orphan.write_bytes(b"")
    try:
        assert "incrementer.api.moved_away (no source)" in build.stale_extensions()
    finally:
        orphan.unlink()
    assert not any(name.endswith("(no source)") for name in build.stale_extensions())


def test_the_pure_python_build_serves(tmp_path: Path) -> None:
    """The same package without its extensions (INCREMENTER_PURE_PYTHON=1 at install) runs."""
    pure = tmp_path / "pure"
    shutil.copytree(SOURCE, pure / "incrementer", ignore=shutil.ignore_patterns("*.so"))
    env = {"PYTHONPATH": str(pure)}
    args = ["--database-url", f"sqlite:///{tmp_path / 'c.db'}", "--data-dir", str(tmp_path)]
    with spawned(args, env=env, cwd=tmp_path) as server:
        assert "pure Python" in server.read_log()
        resp = httpx.post(f"{server.url}/increment", json={"key": "pure", "value": 2})
        assert resp.status_code == 202
        resp = httpx.post(f"{server.url}/increment", json={"key": "pure", "value": 2, "x": 1})
        assert resp.status_code == 400
        server.stop_cleanly()
    with spawned(args, env=env, cwd=tmp_path) as server:
        assert httpx.get(f"{server.url}/counters/pure").json()["value"] == 2
        server.stop()
