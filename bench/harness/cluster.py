"""A throwaway PostgreSQL cluster of one's own (initdb, pg_ctl), to stop, restart and cut off
without touching the machine's PostgreSQL: the soak restarts its database, and the network-fault
tests run one inside a network namespace.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (runuser)
and lives in a directory of its own under the system temp dir, which that user can reach.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "root"  # the role the service connects as (trust authentication, loopback only)


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


class Cluster:
    """One cluster on 127.0.0.1:port: init() once, then start(), stop(), restart(), destroy().
    With `nice` above 0 its server processes run at that lower CPU priority: on a machine it
    shares with the service, the database then takes what the service leaves idle."""

    def __init__(self, port: int, bin_dir: Path | None = None, nice: int = 0) -> None:
        found = bin_dir or binaries()
        if found is None:
            raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin_dir = found
        self.port = port
        self.nice = nice
        self.dir = Path(tempfile.mkdtemp(prefix="incrementer-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"

    def init(self) -> None:
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            "initdb", "--no-sync", "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "-D", self.data
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.dir} -c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.dir / "log", "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: roll back open transactions, close connections, checkpoint; immediate: as a
        crash (recovery at the next start)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._command("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                capture_output=True,
                check=False,
                cwd=self.dir,
            )
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _command(self, tool: str, *args: object) -> list[str]:
        command = [str(self.bin_dir / tool), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        if self.nice:  # the server `pg_ctl start` runs inherits it
            command = ["nice", "-n", str(self.nice), *command]
        return command

    def _run(self, tool: str, *args: object) -> None:
        # cwd: the postgres user may not be allowed into the caller's directory.
        done = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, cwd=self.dir
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
