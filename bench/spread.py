"""How the kernel spreads connections among N processes answering on one port.

    .venv/bin/python -m bench.spread [--workers 2] [--connections 32] [--duration 3] [--rounds 3]

Two ways for N processes to share a port. "shared": one listening socket, bound by a parent and
inherited by every worker (gunicorn's and uvicorn's way), each worker's event loop accepting from
it. "reuseport": a listening socket per worker, all bound to the port with SO_REUSEPORT, and the
kernel hashing each new connection to one of them (nginx's `listen ... reuseport`, and
`incrementer serve --workers`, whose workers each bind with SO_REUSEPORT while the supervisor
only reserves the port: src/incrementer/process/sharedport.py). Here the parent makes every
socket and hands each worker its own by file descriptor (in reuseport mode a bound socket that
never listens holds the port until the workers listen); which listening socket a connection
lands on is the kernel's choice either way.

This starts N lean uvloop servers (bench/servers/lean.py's protocol, counting what they accept)
each way, loads them with wrk, directly and through nginx with upstream keepalive, and prints
each worker's share of the connections and requests: the spread that `--workers` relies on. It
measures placement, not speed, so a busy machine does not spoil it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench.harness.machine import which
from bench.harness.paths import ROOT, WRK_SCRIPTS
from bench.harness.targets import free_port, nginx_argv, nginx_conf
from bench.servers.lean import LeanProtocol
from bench.servers.signals import until_stopped

MODES = ("shared", "reuseport")


def serve(sock: socket.socket) -> None:
    """A worker: accept from sock until SIGTERM, then print `connections requests` on stdout."""
    counts = [0, 0]

    class Counting(LeanProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            counts[0] += 1
            super().connection_made(transport)

        def on_message_complete(self) -> None:
            counts[1] += 1
            super().on_message_complete()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Counting, sock=sock, backlog=4096)
        print("ready", flush=True)
        await until_stopped()
        server.close()

    uvloop.run(run())
    print(f"{counts[0]} {counts[1]}", flush=True)


def listener(port: int, reuse_port: bool, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(4096)
    return sock


def start_workers(mode: str, workers: int) -> tuple[int, list[subprocess.Popen[str]]]:
    """N worker processes on one port; the parent keeps no listening socket of its own."""
    # reuseport: a bound socket that never listens reserves the port and takes no connections
    probe = listener(0, reuse_port=mode == "reuseport", listen=mode == "shared")
    port = probe.getsockname()[1]
    procs = []
    for _ in range(workers):
        sock = probe if mode == "shared" else listener(port, reuse_port=True)
        fd = sock.fileno()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.spread", "--serve-fd", str(fd)],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(fd,),
                cwd=ROOT,
            )
        )
        if sock is not probe:
            sock.close()
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    probe.close()  # reuseport: the probe only reserved the port; shared: the workers hold it
    return port, procs


# nginx in front of the group, keepalive to it as deploy/nginx/incrementer.conf has.
NGINX_PROXY = """\
    upstream group {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://group;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def wrk(port: int, connections: int, duration: float) -> None:
    script = WRK_SCRIPTS / "increments.lua"
    subprocess.run(
        [which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(script),
         f"http://127.0.0.1:{port}/", "--", "10keys", "spread-", "1"],
        check=True, capture_output=True,
    )  # fmt: skip


def one_run(
    mode: str, workers: int, connections: int, duration: float, via_nginx: bool
) -> list[tuple[int, int]]:
    port, procs = start_workers(mode, workers)
    nginx = None
    tmp = tempfile.TemporaryDirectory()
    try:
        target = port
        if via_nginx:
            target = free_port()
            conf = Path(tmp.name) / "nginx.conf"
            conf.write_text(nginx_conf(tmp.name, NGINX_PROXY.format(port=target, upstream=port)))
            nginx = subprocess.Popen(nginx_argv(tmp.name, conf))
            time.sleep(0.5)
        wrk(target, connections, duration)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        counts = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            conns, requests = out.split()[-2:]
            counts.append((int(conns), int(requests)))
        tmp.cleanup()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.spread", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(socket.socket(fileno=args.serve_fd))
        return 0
    print(
        f"{args.workers} workers, wrk -c{args.connections} for {args.duration:g} s, "
        f"{args.rounds} rounds; each worker's share of connections / requests"
    )
    for via_nginx in (False, True):
        for mode in MODES:
            shares = []
            for _ in range(args.rounds):
                counts = one_run(mode, args.workers, args.connections, args.duration, via_nginx)
                conns = sum(c for c, _ in counts) or 1
                requests = sum(r for _, r in counts) or 1
                shares.append([(c / conns, r / requests) for c, r in counts])
            label = f"{mode}{' via nginx' if via_nginx else ''}"
            cells = "  ".join(
                "[" + " ".join(f"{c:.0%}/{r:.0%}" for c, r in sorted(run, reverse=True)) + "]"
                for run in shares
            )
            worst = statistics.mean(max(r for _, r in run) for run in shares)
            print(f"{label:<22} {cells}   busiest worker's requests: {worst:.0%} on average")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
