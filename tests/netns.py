"""A network namespace of a test's own: its loopback, its firewall, nothing else.

The test's thread enters it (setns(2)) for as long as the test runs, so every socket it opens and
every process it starts (a PostgreSQL cluster, the service, a load) lives on that namespace's
127.0.0.1, where iptables rules aimed at one port cut, reset or thin out one link and nothing of
the machine's. On leaving, the thread goes back and the namespace is deleted with its rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator

from support import unique

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a reason to skip), or None."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = unique("incr-probe-")
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def iptables(self, *rule: str) -> None:
        """One iptables command in this namespace, e.g. ("-A", "INPUT", "-p", "tcp", ...)."""
        _run("ip", "netns", "exec", self.name, "iptables", "-w", *rule)

    def flush_rules(self) -> None:
        """Remove every rule: the network heals."""
        self.iptables("-F", "INPUT")

    def drop(self, port: int) -> None:
        """A blackhole: every packet to or from port vanishes, no reset, no answer."""
        for direction in ("--dport", "--sport"):
            self.iptables("-A", "INPUT", "-p", "tcp", direction, str(port), "-j", "DROP")

    def reset(self, port: int) -> None:
        """A reset storm: every packet to port is answered by a TCP reset."""
        self.iptables(
            "-A", "INPUT", "-p", "tcp", "--dport", str(port),
            "-j", "REJECT", "--reject-with", "tcp-reset",
        )  # fmt: skip

    def lose(self, port: int, probability: float) -> None:
        """Random loss: each packet to or from port dropped with this probability."""
        for direction in ("--dport", "--sport"):
            self.iptables(
                "-A", "INPUT", "-p", "tcp", direction, str(port),
                "-m", "statistic", "--mode", "random", "--probability", f"{probability:.2f}",
                "-j", "DROP",
            )  # fmt: skip

    def drop_answers_after_commit(self, port: int) -> None:
        """The link dies right after a COMMIT reaches the server: the packet carrying it passes,
        then nothing more comes back from port (its acknowledgement included), so the client
        cannot know whether the transaction committed.

        The rule that drops the answers goes in first, and it is the order of the two
        commands that matters, not their order in the chain (they match opposite directions,
        and this one matches nothing until a COMMIT is seen): added second, a COMMIT passing
        between the two commands would get its answer through and the cut would fall on the
        next transaction before its COMMIT was sent."""
        self.iptables(
            "-A", "INPUT", "-p", "tcp", "--sport", str(port),
            "-m", "recent", "--name", "commit_seen", "--rcheck", "-j", "DROP",
        )  # fmt: skip
        self.iptables(
            "-A", "INPUT", "-p", "tcp", "--dport", str(port),
            "-m", "string", "--algo", "bm", "--string", "COMMIT",
            "-m", "recent", "--name", "commit_seen", "--set", "-j", "ACCEPT",
        )  # fmt: skip

    def commits_seen(self) -> int:
        """How many packets the COMMIT rule has matched (0 until one passed)."""
        listed = subprocess.run(
            ["ip", "netns", "exec", self.name, "iptables", "-w", "-L", "INPUT", "-v", "-n", "-x"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in listed.splitlines():
            if "STRING match" in line:
                return int(line.split()[0])
        return 0


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A new namespace with lo up, this thread inside it until the block ends."""
    name = unique("incr-")
    _run("ip", "netns", "add", name)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield Namespace(name)
        finally:
            _setns(home)
    finally:
        os.close(home)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
