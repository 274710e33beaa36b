"""The deployment kit is code: the systemd unit passes `systemd-analyze verify` and holds what the
runbook promises, its environment file starts the service, its memory sandbox does not break it,
and the nginx TLS config serves a live instance over HTTPS."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from fleet import nginx_binary, nginx_main_conf, nginx_running
from live_server import keyed_server
from support import LISTEN, db_totals, free_port, serve_args, skip_or_fail, spawned

from incrementer.cli.errors import USAGE
from incrementer.config import EXIT_GRACE, Settings
from incrementer.process.supervisor import KILL_GRACE

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
NGINX = ROOT / "deploy" / "nginx"
INCREMENTER = Path(sys.executable).with_name("incrementer")
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


# --- systemd -----------------------------------------------------------------------------------


def systemd_analyze(unit: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("systemd-analyze is not installed (Debian: apt-get install -y systemd)")
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def unit_text() -> str:
    """The unit with ExecStart pointing at this environment's `incrementer` (verify checks that
    the program exists)."""
    text = (SYSTEMD / "incrementer.service").read_text()
    assert "ExecStart=/opt/incrementer/bin/incrementer serve" in text
    return text.replace("/opt/incrementer/bin/incrementer", str(INCREMENTER))


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit; a misspelt directive in it
    would be reported."""
    unit = tmp_path / "incrementer.service"
    unit.write_text(unit_text())
    verified = systemd_analyze(unit)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout + verified.stderr == ""
    unit.write_text(unit_text().replace("Restart=on-failure", "Restart=on-failure\nRestat=always"))
    mistaken = systemd_analyze(unit)
    assert "Unknown key" in mistaken.stderr and "Restat" in mistaken.stderr


def test_unit_stops_gracefully_and_is_sandboxed() -> None:
    """SIGTERM with a stop timeout above the drain's deadline, restarts on failure, the data dir
    in StateDirectory, settings from an EnvironmentFile, room for every connection, sandboxed."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / "incrementer.service").read_text())
    service = parser["Service"]
    defaults = Settings()
    assert service["KillSignal"] == "SIGTERM"
    # A --workers supervisor's own ceiling is the longest: a worker's, plus its kill grace.
    assert int(service["TimeoutStopSec"]) > defaults.shutdown_timeout + EXIT_GRACE + KILL_GRACE
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(USAGE)  # no restart fixes a bad setting
    assert service["StateDirectory"] == "incrementer"
    assert service["Environment"] == "INCREMENTER_DATA_DIR=%S/incrementer/data"
    assert service["EnvironmentFile"] == "/etc/incrementer/incrementer.env"
    assert int(service["LimitNOFILE"]) > defaults.max_connections
    sandbox = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {key: service.get(key) for key in sandbox} == sandbox


def env_file() -> dict[str, str]:
    """incrementer.env's settings, the commented-out examples included."""
    found = {}
    for line in (SYSTEMD / "incrementer.env").read_text().splitlines():
        match = re.match(r"#?\s*(INCREMENTER_\w+)=(\S*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_environment_file_names_real_settings_and_starts_the_service(tmp_path: Path) -> None:
    """Every INCREMENTER_* in incrementer.env is a setting, and the service starts with the file's
    values (its database swapped for SQLite): keys required, /metrics refuses a caller without."""
    settings = env_file()
    fields = {name.upper() for name in Settings.__dataclass_fields__}
    assert {name.removeprefix("INCREMENTER_") for name in settings} <= fields
    active = {
        name: value
        for name, value in settings.items()
        if not re.search(rf"^#\s*{name}=", (SYSTEMD / "incrementer.env").read_text(), re.M)
    }
    active["INCREMENTER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'counters.db'}"
    active["INCREMENTER_DATA_DIR"] = str(tmp_path / "data")
    with spawned([], env=active) as server:  # spawn adds --port 0: a free port
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/readyz").status_code == 200
        server.stop_cleanly()


def _deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes does (systemd uses this prctl where the kernel has it):
    no memory both writable and executable, ever, in this process and what it executes."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed")


def test_service_runs_with_memory_deny_write_execute(tmp_path: Path, pg_url: str) -> None:
    """The unit's MemoryDenyWriteExecute=yes does not break the service: under the same kernel
    refusal it migrates, takes increments and flushes them to PostgreSQL, while a process asking
    for writable and executable memory is refused."""
    probe = subprocess.run(
        [sys.executable, "-c", WRITE_EXECUTE],
        capture_output=True,
        text=True,
        preexec_fn=_mdwe_or_exit,
    )
    if probe.returncode == NO_MDWE:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    assert probe.returncode == 3, probe.stderr  # writable and executable memory refused
    args = serve_args(tmp_path, pg_url)
    with serving(args, preexec_fn=_deny_write_execute) as url:
        batch = [{"key": "mdwe", "value": 1}] * 5
        assert httpx.post(url + "/increments", json=batch).status_code == 202
    # The server drained (exit 0, checked on leaving): the final flush wrote the batch.
    assert asyncio.run(db_totals(pg_url, ["mdwe"])) == {"mdwe": 5}


WRITE_EXECUTE = """
import mmap, sys
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    sys.exit(3)
"""


NO_MDWE = 99


def _mdwe_or_exit() -> None:
    try:
        _deny_write_execute()
    except OSError:
        os._exit(NO_MDWE)


@contextlib.contextmanager
def serving(
    args: list[str], prefix: Sequence[str] = (), preexec_fn: Callable[[], None] | None = None
) -> Iterator[str]:
    """`incrementer serve ARGS` run through `prefix` (strace, say) or `preexec_fn`: its URL; on
    leaving, SIGTERM, and the drain must end with status 0."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "incrementer", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    assert proc.stderr is not None
    service = proc.pid
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            match = LISTEN.search(line)
            if match:
                break
        else:
            raise AssertionError("the service did not start:\n" + "".join(lines))
        if prefix:  # the service is the prefix's child (strace exits with its tracee's status)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            service = int(children.split()[0])
        yield match.group(1)
        os.kill(service, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            for pid in {service, proc.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named system call sets (`systemd-analyze syscall-filter`), as listed."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def allowed_by(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """What a unit's SystemCallFilter= lines let through: the first allows a list, each `~` line
    then takes a list away."""

    def expand(items: list[str]) -> set[str]:
        found: set[str] = set()
        for item in items:
            found |= expand(groups[item]) if item.startswith("@") else {item}
        return found

    allowed: set[str] = set()
    for line in filters:
        if line.startswith("~"):
            allowed -= expand(line[1:].split())
        else:
            allowed |= expand(line.split())
    return allowed


def unit_filters() -> list[str]:
    return re.findall(r"(?m)^SystemCallFilter=(.+)$", (SYSTEMD / "incrementer.service").read_text())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_service_makes_only_system_calls_the_unit_allows(
    tmp_path: Path, pg_url: str, workers: str
) -> None:
    """Traced with strace from start to drain (migrations, WAL replay, increments, reads, a flush
    to PostgreSQL, /metrics, /status, fsyncs, SIGTERM), the service, alone or as a --workers
    supervisor and its workers, makes no system call outside the unit's SystemCallFilter; the
    same check finds calls outside a narrower filter.

    On PostgreSQL: SQLite run as root, as tests are, chowns its journal files (fchown, one of
    @privileged), which it does not as the unit's own user."""
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("systemd-analyze is not installed (Debian: apt-get install -y systemd)")
    if shutil.which("strace") is None:
        skip_or_fail("strace is not installed (Debian: apt-get install -y strace)")
    trace = tmp_path / "trace"
    args = serve_args(tmp_path, pg_url, "--workers", workers)
    with serving(args, prefix=["strace", "-f", "-qq", "-o", str(trace)]) as url:
        assert httpx.post(url + "/increment", json={"key": "traced", "value": 1}).status_code == 202
        batch = [{"key": f"traced-{i}", "value": 1} for i in range(50)]
        assert httpx.post(url + "/increments", json=batch).status_code == 202
        for path in ("/counters/traced", "/metrics", "/status", "/readyz", "/healthz"):
            assert httpx.get(url + path).status_code == 200, path
        time.sleep(1.5)  # a periodic WAL fsync (--fsync-interval 1 s) and idle flushes
    made = set(re.findall(r"(?m)^\d+\s+([a-z0-9_]+)\(", trace.read_text()))
    assert {"openat", "fdatasync", "accept4", "connect"} <= made, made
    groups = syscall_groups()
    assert made - allowed_by(unit_filters(), groups) == set()
    narrower = [*unit_filters(), "~@network-io"]
    assert {"accept4", "connect"} <= made - allowed_by(narrower, groups)


# --- nginx with TLS ----------------------------------------------------------------------------


def replaced(text: str, replacements: dict[str, str]) -> str:
    """Each `old` must be in the file as shipped: a config that drifted fails here, loudly."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the shipped config"
        text = text.replace(old, new)
    return text


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def nginx(tmp_path: Path, upstream: str) -> Iterator[tuple[str, str]]:
    """The shipped incrementer.conf and incrementer-tls.conf in front of `upstream` (host:port):
    yields the HTTPS and the plain HTTP base URLs."""
    nginx_binary()  # skips (or fails under CI) before any work when nginx is missing
    cert, key = self_signed(tmp_path)
    https_port, http_port = free_port(), free_port()
    # The upstream's example instances give way to the live one.
    plain = re.sub(
        r"(?m)^\s*server \S+ max_fails=.*\n", "", (NGINX / "incrementer.conf").read_text()
    )
    plain = replaced(
        plain,
        {
            "upstream incrementer {": f"upstream incrementer {{\n    server {upstream};",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
        },
    )
    (tmp_path / "incrementer.conf").write_text(plain)
    tls = replaced(
        (NGINX / "incrementer-tls.conf").read_text(),
        {
            "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen [::]:80;": "",
            "/etc/letsencrypt/live/counters.example.com/fullchain.pem": str(cert),
            "/etc/letsencrypt/live/counters.example.com/privkey.pem": str(key),
        },
    )
    (tmp_path / "incrementer-tls.conf").write_text(tls)
    main = tmp_path / "nginx.conf"
    main.write_text(
        nginx_main_conf(
            tmp_path, "incrementer.conf", "incrementer-tls.conf", worker_connections=256
        )
    )
    with nginx_running(main, https_port):
        yield f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}"


def tls_alpn(url: str, context: ssl.SSLContext) -> str | None:
    """The application protocol the server picks from h2 and http/1.1."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, int(port)), 5) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        return wrapped.selected_alpn_protocol()


def test_nginx_terminates_tls_for_a_live_instance(tmp_path: Path) -> None:
    """Through incrementer-tls.conf: increments, reads, /metrics and /status over HTTPS (TLS 1.2+,
    HSTS, the key passed through, a missing key still 401), the same name over plain HTTP
    redirected, and other names on port 80 left to incrementer.conf's server."""
    (tmp_path / "service").mkdir()
    with (
        keyed_server(tmp_path / "service") as (server, key),
        nginx(tmp_path, server.url.removeprefix("http://")) as (https, http),
    ):
        tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=https, verify=tls, headers=auth) as client:
            accepted = client.post("/increment", json={"key": "tls", "value": 2})
            version = accepted.extensions["network_stream"].get_extra_info("ssl_object").version()
            counted = client.get("/counters/tls")
            metrics = client.get("/metrics")
            page = client.get("/status")
            anonymous = client.get("/metrics", headers={"Authorization": ""})
        alpn = tls_alpn(https, tls)
        redirected = httpx.get(http + "/status", headers={"Host": "counters.example.com"})
        other_name = httpx.get(http + "/healthz", headers={"Host": "internal"})
    assert accepted.status_code == 202, accepted.text
    assert version in ("TLSv1.2", "TLSv1.3")
    assert alpn == "h2"  # HTTP/2 offered to clients that speak it
    assert "max-age=" in accepted.headers["strict-transport-security"]
    assert counted.json() == {"key": "tls", "value": 2}
    assert (
        metrics.status_code == 200 and "incrementer_accepted_increments_total 1.0" in metrics.text
    )
    assert (
        page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    )
    assert anonymous.status_code == 401
    assert redirected.status_code == 301
    assert redirected.headers["location"] == "https://counters.example.com/status"
    assert other_name.status_code == 200 and other_name.json() == {"status": "ok"}


def _proxying(conf: str) -> set[str]:
    return {
        " ".join(line.split())
        for line in conf.splitlines()
        if line.strip().startswith("proxy_") and "X-Forwarded-Proto" not in line
    }


def test_tls_server_proxies_like_the_plain_one() -> None:
    """incrementer-tls.conf's `location /` has incrementer.conf's proxy settings (retries that
    never repeat a POST, keep-alive upstream, timeouts), plus only X-Forwarded-Proto."""
    plain = _proxying((NGINX / "incrementer.conf").read_text())
    tls = _proxying((NGINX / "incrementer-tls.conf").read_text())
    assert "proxy_pass http://incrementer;" in plain
    assert tls == plain
