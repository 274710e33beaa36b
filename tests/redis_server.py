"""A redis-server of the test's own (bench/harness/redisserver.py), on a free port, that the test
may kill and start again; without redis-server the test skips (fails under CI=true). The
machine's Redis (127.0.0.1:6379) is never stopped nor flushed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from support import skip_or_fail

from bench.harness.machine import which
from bench.harness.redisserver import RedisServer, redis_server


def require_redis() -> None:
    if which("redis-server") is None:
        skip_or_fail("redis-server is not installed (Debian: apt-get install redis-server)")


@contextlib.contextmanager
def own_redis(directory: Path, password: str = "") -> Iterator[RedisServer]:
    require_redis()
    with redis_server(directory, password) as server:
        yield server
