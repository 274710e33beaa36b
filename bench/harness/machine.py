"""The machine the benchmark runs on: the tools it needs, and a description for the report."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

TOOLS = ("wrk", "nginx")
INSTALL_HINT = """\
The benchmark needs wrk (load generator) and nginx (the HTTP ceiling). Install them with:

    sudo apt-get update && sudo apt-get install -y wrk nginx-light

(Debian/Ubuntu packages. Elsewhere: https://github.com/wg/wrk and your distribution's nginx.)"""


def which(tool: str) -> str | None:
    """PATH first, then the sbin directories nginx lives in but a user's PATH may lack."""
    found = shutil.which(tool)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / tool
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpuinfo_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def describe(postgres_version: str) -> dict[str, str]:
    wrk_path, nginx_path = which("wrk"), which("nginx")
    return {
        "CPUs (nproc)": str(os.cpu_count()),
        "CPU model": _cpuinfo_model(),
        "Memory": _memory(),
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "PostgreSQL": postgres_version,
        "wrk": _first_line([wrk_path, "-v"]) if wrk_path else "missing",
        "nginx": _first_line([nginx_path, "-v"]) if nginx_path else "missing",
        "Load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
