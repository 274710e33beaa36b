"""The hash-pinned locks in requirements/: every package pinned with its hashes, agreeing with the
ranges in the pyproject.toml files, and what ./scripts/test (and so CI) installs from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SERVICE = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def pins(lock: str) -> dict[str, tuple[str, int]]:
    """{canonical name: (version, number of hashes)} of each requirement in a lock; an
    AssertionError for any requirement line that is not `name==version` with hashes."""
    found: dict[str, tuple[str, int]] = {}
    text = (ROOT / "requirements" / lock).read_text()
    # One requirement per logical line: its hashes follow on continuation lines.
    for entry in re.sub(r"\\\n\s*", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        assert not entry.startswith("-"), f"{lock}: an option line, machine-specific: {entry!r}"
        pin = PIN.match(entry)
        assert pin, f"{lock}: not pinned to one version: {entry!r}"
        hashes = len(HASH.findall(entry))
        assert hashes, f"{lock}: {pin.group(1)} has no hash"
        found[canonicalize_name(pin.group(1))] = (pin.group(2), hashes)
    return found


def wanted(*requirements: str) -> list[Requirement]:
    return [Requirement(text) for text in requirements]


LOCKS = {
    "service.txt": wanted(
        *SERVICE["project"]["dependencies"], *SERVICE["build-system"]["requires"]
    ),
    "client.txt": wanted(*CLIENT["project"]["dependencies"], *CLIENT["build-system"]["requires"]),
    "dev.txt": wanted(
        *SERVICE["project"]["dependencies"],
        *SERVICE["project"]["optional-dependencies"]["test"],
        *SERVICE["project"]["optional-dependencies"]["bench"],
        *SERVICE["build-system"]["requires"],
        *CLIENT["project"]["dependencies"],
    ),
}


@pytest.mark.parametrize("lock", LOCKS)
def test_a_lock_pins_every_dependency_in_its_range(lock: str) -> None:
    """Guards item: dependencies. Each lock exists, pins every package to one version with
    its sha256 hashes, and pins each dependency the pyproject.toml files name (build
    requirements included) at a version their range accepts: a range changed without
    `scripts/lock` fails here."""
    pinned = pins(lock)
    for requirement in LOCKS[lock]:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock} does not pin {requirement} (run scripts/lock)"
        version, _ = pinned[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside {requirement} (run scripts/lock)"
        )
        for extra in requirement.extras:  # psycopg[binary]: psycopg-binary
            assert canonicalize_name(f"{name}-{extra}") in pinned, f"{lock}: {requirement}"


def test_the_locks_agree_with_each_other() -> None:
    """A package pinned in the service's or the client's lock is pinned at the same version
    in the one CI tests with, so what is deployed is what was tested."""
    dev = pins("dev.txt")
    for lock in ("service.txt", "client.txt"):
        for name, (version, _) in pins(lock).items():
            assert dev.get(name, (None, 0))[0] == version, f"{lock} and dev.txt differ on {name}"


def test_scripts_test_installs_from_the_lock() -> None:
    """Guards item: dependencies. ./scripts/test (which .ci/run runs) installs third-party
    packages only from the lock, hash-checked, and this checkout's two packages without
    dependencies of their own."""
    script = (ROOT / "scripts" / "test").read_text()
    installs = [line for line in script.splitlines() if " install " in line]
    assert any("--require-hashes -r requirements/dev.txt" in line for line in installs), installs
    for line in installs:
        if "--require-hashes" in line or "--upgrade pip" in line:
            continue
        assert "--no-deps" in line, f"installs dependencies outside the lock: {line}"
