"""What /proc says: CPU time of the target, of PostgreSQL, of wrk and of the whole machine, and
the memory of a target's processes.

On a 2-core machine the load generator, the server and the database share the cores, so req/s alone
does not say who is the bottleneck. User and system CPU seconds per request do: they are what a
request costs, whatever else the machine is doing.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    user: float = 0.0  # seconds
    system: float = 0.0

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user + other.user, self.system + other.system)

    @property
    def total(self) -> float:
        return self.user + self.system


def _stat(pid: int) -> tuple[int, CpuTimes] | None:
    """(process group, CPU times) of one process, from /proc/PID/stat; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[2]), CpuTimes(int(fields[11]) / TICK, int(fields[12]) / TICK)


def process_group(pgid: int) -> CpuTimes:
    """Every process of a target's group: nginx's master and workers, or the service (with
    --workers: its supervisor and workers)."""
    total = CpuTimes()
    for pid in _group(pgid):
        found = _stat(pid)
        if found is not None:
            total += found[1]
    return total


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None and found[0] == pgid:
                pids.append(int(entry))
    return pids


def memory(pid: int, field: str) -> int | None:
    """Bytes of one memory line of /proc/PID/status (`VmRSS`, `VmHWM`); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss(pgid: int) -> int:
    """Bytes: each process's peak resident set (VmHWM) summed over the target's group, read
    before it stops. For a group of processes that is an upper bound of their peak together."""
    return sum(memory(pid, "VmHWM") or 0 for pid in _group(pgid))


def processes(pids: list[int]) -> dict[int, CpuTimes]:
    """CPU times of the given processes (PostgreSQL backends), skipping those that are gone."""
    out = {}
    for pid in pids:
        found = _stat(pid)
        if found is not None:
            out[pid] = found[1]
    return out


def since(before: dict[int, CpuTimes], after: dict[int, CpuTimes]) -> CpuTimes:
    """CPU used between two `processes()` readings; a process new since `before` counts whole."""
    total = CpuTimes()
    for pid, times in after.items():
        total += times - before.get(pid, CpuTimes())
    return total


@dataclass(frozen=True)
class MachineTimes:
    """Whole-machine CPU time by kind, from the first line of /proc/stat (seconds, all CPUs)."""

    busy: float = 0.0
    softirq: float = 0.0  # the kernel's network processing: loopback TCP, charged to no process
    idle: float = 0.0

    def __sub__(self, other: MachineTimes) -> MachineTimes:
        return MachineTimes(
            self.busy - other.busy, self.softirq - other.softirq, self.idle - other.idle
        )


def machine() -> MachineTimes:
    fields = [int(x) / TICK for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return MachineTimes(user + nice + system + irq + softirq + steal, softirq, idle + iowait)


def children() -> CpuTimes:
    """Waited-for children of this process (wrk, once it has exited and been reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuTimes(usage.ru_utime, usage.ru_stime)
