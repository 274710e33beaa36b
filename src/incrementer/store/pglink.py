"""How a dead or silent link to PostgreSQL is noticed within --database-timeout, on both ends.

Without these, a partition that drops packets without a reset leaves a half-open connection that
TCP keeps retransmitting into for about 15 minutes, and a statement on it waits for asyncpg's
command timeout (60 s by default) while the log and /readyz say nothing.

- Our end (each socket of the pool, set as asyncpg opens it): TCP_USER_TIMEOUT aborts a connection
  whose sent data stays unacknowledged for the timeout, and TCP keepalive probes an idle one (a
  statement sent and acknowledged, its answer never coming) so that the same limit applies.
- PostgreSQL's end (the same limits as session settings: tcp_user_timeout and tcp_keepalives_*):
  a backend whose client vanished mid-transaction rolls back and releases its row locks within the
  timeout, instead of holding the node's ledger row until the server's TCP gives up, which would
  make the retry of that batch wait behind it.
- A connection attempt bounded by half the timeout: a SYN lost to a partition is sent again
  after 1 s, then 3 s, so an attempt begun during the partition would see the heal only seconds
  late; a fresh attempt after a short backoff sees it at once.
- A statement bound (statement_timeout on the server, asyncpg's command_timeout here) for a
  database that keeps the link alive and never answers: the flush is abandoned and retried on a
  new connection, where the ledger makes the retry of a batch that did commit a no-op.
"""

from __future__ import annotations

import socket
from typing import Any

import asyncpg

# A statement may take this many database timeouts before it is abandoned: a flush of many keys
# legitimately takes longer than a silent link is allowed to stay silent.
STATEMENT_TIMEOUTS = 10
# Keepalive probes within one timeout: the first after a third of it idle, then every third.
PROBES = 3


def connect_timeout(timeout: float) -> float:
    """Seconds one connection attempt may take."""
    return timeout / 2


def statement_timeout(timeout: float) -> float:
    """Seconds a statement may run before it is abandoned (asyncpg's command_timeout)."""
    return STATEMENT_TIMEOUTS * timeout


def server_settings(timeout: float) -> dict[str, str]:
    """PostgreSQL session settings that apply the timeout at the server's end of the link."""
    idle = _probe_interval(timeout)
    return {
        "tcp_user_timeout": str(_milliseconds(timeout)),
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(idle),
        "tcp_keepalives_count": str(PROBES),
        "statement_timeout": str(_milliseconds(statement_timeout(timeout))),
    }


def tune_socket(sock: Any, timeout: float) -> None:
    """Set our end's keepalive and TCP_USER_TIMEOUT on a TCP socket (not on a Unix socket: a local
    server's death is seen at once)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = _probe_interval(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # pragma: no mutate
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _milliseconds(timeout))


def connection_class(timeout: float) -> type[asyncpg.Connection]:
    """An asyncpg connection class whose socket is tuned as it opens: asyncpg offers no socket
    option of its own, and its pool builds every connection through this class."""

    class TunedConnection(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(protocol, transport, *args, **kwargs)
            tune_socket(transport.get_extra_info("socket"), timeout)

    return TunedConnection


def _probe_interval(timeout: float) -> int:
    """Whole seconds (what the kernel and PostgreSQL take), at least one."""
    return max(1, int(timeout / PROBES))


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
