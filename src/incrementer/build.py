"""Which build of the hot path is running: compiled by mypyc (setup.py) or plain Python."""

from __future__ import annotations

import sys
from importlib import metadata, util
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# A module every request runs through, compiled in every compiled build (setup.py's HOT_PATH).
# Located, not imported: this module sits below everything it describes.
_PROBE = "incrementer.http.protocol"


def compiled() -> bool:
    """True when the hot path runs as C extensions built by mypyc at install time."""
    spec = util.find_spec(_PROBE)
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")


def version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version("incrementer")
    except metadata.PackageNotFoundError:
        return "unknown"


def name() -> str:
    """The build label of incrementer_build_info: `compiled` or `pure-python`."""
    return "compiled" if compiled() else "pure-python"


def stale_extensions() -> list[str]:
    """Compiled modules that are not the code on disk: a loaded one whose source was edited after
    it was built (in an editable install Python imports the extension, so the code running is
    not the code on disk until `pip install -e .`, which ./scripts/test runs, compiles it again),
    and an extension file in the package whose source is gone (moved or deleted: a rebuild does
    not remove it, and an import of the old name would still find it)."""
    # With mypyc's group build, the code of every module is in one shared library and each
    # module's own extension is a shim that is rewritten only when its interface changes.
    shared = getattr(sys.modules.get("incrementer__mypyc"), "__file__", None)
    stale = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if not name.startswith("incrementer") or file.endswith(".py") or not file:
            continue
        built = Path(file)
        source = built.with_name(built.name.split(".", 1)[0] + ".py")
        built_at = max(built.stat().st_mtime, Path(shared).stat().st_mtime if shared else 0)
        if source.exists() and source.stat().st_mtime > built_at:
            stale.append(name)
    package = Path(__file__).parent
    for path in package.rglob("*"):
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if (
            suffix is not None
            and not path.with_name(path.name.removesuffix(suffix) + ".py").exists()
        ):
            parts = path.relative_to(package.parent).parts
            stale.append(".".join((*parts[:-1], path.name.removesuffix(suffix))) + " (no source)")
    return sorted(stale)
