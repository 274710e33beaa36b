"""Who held the service's core while it waited to run: `perf sched timehist -w` read back.

Each line of timehist is one switch-out of a task on a CPU: the time it left, the CPU, the task
(`comm[tid]` for a main thread, `comm[tid/pid]` for another thread), how long it had been away
(wait time), how long of that it was runnable but not running (sch delay) and how long it then
ran. A wait of the service's event-loop thread is the span from its wakeup to its switch-in; the
tasks that ran on that CPU inside the span are what it waited behind (`<idle>`: the CPU was idle,
which on a virtual machine is the time a halted vCPU takes to be run again)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LINE = re.compile(
    r"\s*(?P<at>\d+\.\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<task>\S+)\s+"
    r"(?P<wait>\d+\.\d+)\s+(?P<delay>\d+\.\d+)\s+(?P<run>\d+\.\d+)"
)
SLOW_MS = 0.5  # a run-queue wait this long or longer is counted and attributed


@dataclass(frozen=True)
class Switch:
    at: float  # seconds: when the task left the CPU
    cpu: int
    task: str
    delay_ms: float  # runnable but not running, before this stretch on the CPU
    run_ms: float  # this stretch on the CPU

    @property
    def began(self) -> float:
        return self.at - self.run_ms / 1000

    @property
    def comm(self) -> str:
        return self.task.split("[", 1)[0]


@dataclass
class Waits:
    """The event-loop thread's run-queue waits over one recording."""

    switches: int = 0
    ran_ms: float = 0.0
    delay_ms: float = 0.0
    slow: int = 0  # waits of SLOW_MS or more
    slow_ms: float = 0.0
    behind: dict[str, float] = field(default_factory=dict)
    """Milliseconds of the slow waits during which each command ran on the waiting CPU."""


def parse(text: str) -> list[Switch]:
    switches = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            switches.append(
                Switch(float(m["at"]), int(m["cpu"]), m["task"], float(m["delay"]), float(m["run"]))
            )
    return switches


def waits(switches: list[Switch], pid: int) -> Waits:
    """The run-queue waits of the thread whose tid is `pid` (a process's main thread, the
    service's event loop), and what ran on its CPU during those of SLOW_MS or more."""
    me = f"[{pid}]"
    found = Waits()
    by_cpu: dict[int, list[Switch]] = {}
    for s in switches:
        by_cpu.setdefault(s.cpu, []).append(s)
    for s in switches:
        if not s.task.endswith(me):
            continue
        found.switches += 1
        found.ran_ms += s.run_ms
        found.delay_ms += s.delay_ms
        if s.delay_ms < SLOW_MS:
            continue
        found.slow += 1
        found.slow_ms += s.delay_ms
        woken = s.began - s.delay_ms / 1000
        for other in by_cpu.get(s.cpu, []):
            overlap = min(other.at, s.began) - max(other.began, woken)
            if overlap > 0 and other.task != s.task:
                found.behind[other.comm] = found.behind.get(other.comm, 0.0) + overlap * 1000
    return found
