"""Podman as this machine runs it, and the project's image built with it: for the container tests
(tests/test_container.py, tests/test_compose.py) and the cold-start measurement (bench.container).

What works here, and why each setting: Debian's podman with runc (crun fails on the rlimits and
the hybrid cgroup hierarchy of these machines), cgroupfs (no systemd as process 1), no default
ulimits (CONTAINERS_CONF; raising them is refused), host networking; and builds on the host
network with the machine's pip configuration and CA bundle mounted read-only, never copied in.
No registry image can be pulled, so the Dockerfile's BASE_IMAGE is a Debian 12 root file system
made by scripts/container-base (debootstrap) and kept in podman's image store between runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness.paths import ROOT

BASE_IMAGE = "localhost/incrementer-base:bookworm"
DATA = "/var/lib/incrementer"
"""The image's VOLUME: its data dir (the WAL) and, with the SQLite default, its database."""
IMAGE = "localhost/incrementer:latest"
GLOBAL_FLAGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"
# The machine's CA bundle (a TLS-inspecting proxy's CA among them), for the build's pip.
BUILD_MOUNTS = ("/etc/ssl/certs",)
# The systemd timer podman would start for a HEALTHCHECK needs systemd as process 1; without it
# podman logs an error per container. `podman healthcheck run` still runs the check on demand.
NO_HEALTH_TIMER = ("--health-interval", "disable")


def missing_tools() -> list[str]:
    """The programs a container test needs that this machine lacks (Debian packages)."""
    return [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]


@dataclass(frozen=True)
class Podman:
    """`podman` with this machine's settings; `conf` is where CONTAINERS_CONF is written."""

    conf: Path

    def __post_init__(self) -> None:
        self.conf.write_text(CONTAINERS_CONF)

    @property
    def command(self) -> list[str]:
        return ["podman", *GLOBAL_FLAGS]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS` to its end; with `check`, a failure raises with podman's stderr."""
        done = subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done

    def base_image(self) -> str:
        """The Debian 12 base (scripts/container-base makes it once; ~1 min)."""
        subprocess.run(
            [str(ROOT / "scripts" / "container-base"), BASE_IMAGE],
            env={**self.env, "PODMAN": " ".join(self.command)},
            check=True,
            capture_output=True,
            timeout=900,
        )
        return BASE_IMAGE

    def build(self, tag: str = IMAGE, base: str | None = None) -> float:
        """Build the repository's Dockerfile as `tag` on `base` (default: the Debian 12 base);
        the seconds it took. podman's layer cache makes a rebuild of unchanged sources quick."""
        started = time.monotonic()
        mounts = [f"--volume={path}:{path}:ro" for path in BUILD_MOUNTS if os.path.exists(path)]
        self.run(
            "build",
            "--format=docker",  # the OCI image format has no HEALTHCHECK
            "--network=host",
            *mounts,
            f"--build-arg=BASE_IMAGE={base or self.base_image()}",
            f"--tag={tag}",
            str(ROOT),
            timeout=1800,
        )
        return time.monotonic() - started

    def start(self, image: str, name: str, volume: str, env: dict[str, str]) -> None:
        """`podman run` `image` detached as `name`, on the host network with a read-only root
        file system (as the Kubernetes manifests run it), `volume` on its data volume and `env`
        as its variables."""
        self.run(
            "run",
            "--detach",
            f"--name={name}",
            "--network=host",
            "--read-only",
            *NO_HEALTH_TIMER,
            f"--volume={volume}:{DATA}",
            *(f"--env={key}={value}" for key, value in env.items()),
            image,
        )

    def image_bytes(self, image: str) -> int:
        """The image's size as podman reports it (uncompressed layers)."""
        return int(self.run("image", "inspect", "--format={{.Size}}", image).stdout)


def dockerfile(instruction: str) -> str:
    """The argument of the Dockerfile's last INSTRUCTION (USER, VOLUME, EXPOSE...), or of its
    `ENV NAME=value` line for an environment variable's NAME."""
    text = (ROOT / "Dockerfile").read_text()
    if instruction.isupper() and " " not in instruction and "_" not in instruction:
        found = re.findall(rf"^{instruction} (.+)$", text, re.MULTILINE)
    else:
        found = re.findall(rf"\b{instruction}=(\S+)", text)
    if not found:
        raise LookupError(f"the Dockerfile has no {instruction}")
    return str(found[-1])
